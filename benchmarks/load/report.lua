-- wrk script: prints one line "LOADJSON {...}" when the run ends, which run.py parses.
-- Latencies are in microseconds, from wrk's own histogram of completed responses.
-- status_errors counts responses with a status of 400 or more (wrk's own rule; the
-- endpoints driven here answer 200 or an error, never a redirect).
-- statuses.lua (the stress scenario) loads this file for report() and defines its own done().

function report(summary, latency)
  local e = summary.errors
  io.write(string.format(
    'LOADJSON {"duration_us": %d, "requests": %d, "bytes": %d, ' ..
    '"connect_errors": %d, "read_errors": %d, "write_errors": %d, "status_errors": %d, "timeouts": %d, ' ..
    '"p50_us": %d, "p90_us": %d, "p95_us": %d, "p99_us": %d, "max_us": %d, "mean_us": %.1f}\n',
    summary.duration, summary.requests, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(95), latency:percentile(99),
    latency.max, latency.mean))
end

if done == nil then
  done = function(summary, latency, requests)
    report(summary, latency)
  end
end
