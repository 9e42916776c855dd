-- wrk script of the stress scenario: report.lua's line, plus "STATUSJSON {...}": the responses by
-- status, and the 503s by the guarded view's error category ({"ok": false, "category": "..."}),
-- "none" for a 503 without one. Each wrk thread counts in its own Lua state; done() sums them.
-- A response callback costs wrk some CPU per response, so only the stress scenario uses it.

local threads = {}

setup = function(thread)
  table.insert(threads, thread)
end

init = function(args)
  statuses = {}
  categories = {}
end

response = function(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
  if status == 503 then
    local category = body and string.match(body, '"category": *"([%w_]+)"') or "none"
    categories[category] = (categories[category] or 0) + 1
  end
end

local function add(into, from)
  for key, count in pairs(from or {}) do
    into[key] = (into[key] or 0) + count
  end
end

local function encode(counts)
  local parts = {}
  for key, count in pairs(counts) do
    table.insert(parts, string.format('"%s": %d', tostring(key), count))
  end
  return "{" .. table.concat(parts, ", ") .. "}"
end

done = function(summary, latency, requests)
  local all_statuses, all_categories = {}, {}
  for _, thread in ipairs(threads) do
    add(all_statuses, thread:get("statuses"))
    add(all_categories, thread:get("categories"))
  end
  dofile("benchmarks/load/report.lua")
  report(summary, latency)
  io.write('STATUSJSON {"statuses": ' .. encode(all_statuses) .. ', "categories_503": ' ..
           encode(all_categories) .. '}\n')
end
