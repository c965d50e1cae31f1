"""One simulated gateway for the admission tests: an OS process with its own Admission, following the stack's topics
and publishing its decisions, asking for reservations it never settles for `seconds`; prints what it was granted.

`python -m tests.e2e.gateway_process GATEWAY_ID SHARE SECONDS` with the stack's TALLY_* settings in the environment.
"""

from __future__ import annotations

import sys
import time
from decimal import Decimal

import orjson

from tally.config import load_settings
from tally.sdk.admission import Admission, Follower, KafkaDecisions

REQUEST = {"feature_id": "search_answer", "provider": "openai", "model": "o4-mini", "input_tokens": 1000,
           "max_output_tokens": 500}


def main(gateway_id: str, share: str, seconds: float) -> None:
    settings = load_settings()
    topics = settings.topics
    decisions = KafkaDecisions(settings.kafka, topics.budget_decisions)
    admission = Admission(gateway_id, publish=decisions.publish, share=Decimal(share))
    follower = Follower(admission, settings.kafka, topics.budget_state, (topics.price_cards, topics.policies))
    follower.start(60)
    granted = Decimal(0)
    admitted = denied = 0
    deadline = time.monotonic() + seconds
    i = 0
    while time.monotonic() < deadline:  # bounded: `seconds` of requests, one every 20 ms
        decision = admission.reserve(request_id=f"{gateway_id}-{i}", **REQUEST)
        if decision.reservation is not None:
            granted += decision.reservation.amount_usd
            admitted += 1
        else:
            denied += 1
        i += 1
        time.sleep(0.02)
    decisions.flush()
    follower.stop()
    sys.stdout.write(orjson.dumps({"gateway": gateway_id, "granted_usd": str(granted), "admitted": admitted,
                                   "denied": denied}).decode() + "\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]))
