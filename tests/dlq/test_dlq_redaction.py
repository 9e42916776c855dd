"""Secrets never reach what the dead letter queue stores: error details, headers, messages."""

from integrations.dlq.redaction import REDACTED, redact_secrets, redact_text


def test_secret_keys_are_redacted_at_any_depth_whatever_their_case():
    details = {
        "Authorization": "Bearer abc",
        "request": {"headers": {"X-Api-Key": "k1", "Accept": "application/json"},
                    "body": [{"password": "hunter2", "user": "ann"}]},
        "client_secret": "s", "refresh_token": "t", "API_KEY": "u", "Cookie": "sessionid=1", "status": 503,
    }
    assert redact_secrets(details) == {
        "Authorization": REDACTED,
        "request": {"headers": {"X-Api-Key": REDACTED, "Accept": "application/json"},
                    "body": [{"password": REDACTED, "user": "ann"}]},
        "client_secret": REDACTED, "refresh_token": REDACTED, "API_KEY": REDACTED, "Cookie": REDACTED,
        "status": 503,
    }


def test_header_pairs_are_redacted_by_name():
    headers = [("authorization", "Basic eA=="), ("content-type", "text/plain")]
    assert redact_secrets({"headers": headers}) == {
        "headers": [["authorization", REDACTED], ["content-type", "text/plain"]]}


def test_secrets_in_a_query_string_of_a_message_are_redacted():
    assert (redact_text("GET https://api.example/v1?api_key=abc&page=2&access_token=xyz returned 503")
            == f"GET https://api.example/v1?api_key={REDACTED}&page=2&access_token={REDACTED} returned 503")


def test_the_original_is_left_untouched():
    details = {"token": "abc"}
    redact_secrets(details)
    assert details == {"token": "abc"}
