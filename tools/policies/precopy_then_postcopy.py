#!/usr/bin/env python3
"""Pre-copy until the dirty rate stops falling, then post-copy the rest.

An external migration policy for `vmm migrate --policy exec:PROGRAM`.

The engine asks one question per line on stdin, as JSON:

    {"ask": "after_round", "view": {"rounds": [...], "pending_pages": 812, ...}}

and reads the decision as one JSON line on stdout:

    {"post_copy": {"rule": "policy"}}

Questions and answers (the serde form of migration/src/policy/mod.rs):

    setup       -> {"measure_rates": bool, "may_postcopy": bool}
    plan        -> {"start": "pre_copy" | "post_copy" | {"hybrid": {"precopy_bytes": N}}}
    round       -> {"skip": "nothing" | "redirtied"}
    after_round -> {"continue": {"throttle": "unchanged" | {"percent": N}}}
                 | {"stop_and_copy": {"rule": RULE}} | {"post_copy": {"rule": RULE}}
                   RULE: converged, downtime, threshold, max_rounds, max_bytes,
                         policy (a rule of the policy's own)
    push_order  -> "ascending" | "follow_faults"

Every answer must come within the deadline (2 s unless --policy-deadline
says otherwise) and on one line of at most 64 KiB; anything else fails the
migration cleanly, the guest running on at the source. stdout is the
answer channel, so log to stderr: the source vmm forwards it to its log.

The idea: each pre-copy round re-sends what the guest dirtied during the
previous one. While the dirty rate falls, rounds shrink and another round
is worth its cost; once it stops falling (the guest's working set is hot
and the rounds no longer shrink), more rounds only resend the same pages.
Then switch to post-copy: pause, send the vCPU state, and let the
destination run at once, fetching each page still missing on its first
touch while the rest is pushed in the background. The switch costs the
downtime of the state alone, not of the dirty set.
"""

import json
import sys

# Pre-copy stops anyway once the predicted downtime is within the limit
# (then stop-and-copy: nothing is left for post-copy to do).
# A round whose dirty rate is at least this share of the previous round's
# has not "fallen".
NOT_FALLING = 0.95


def log(*args):
    print("precopy_then_postcopy:", *args, file=sys.stderr, flush=True)


def setup(view):
    # May post-copy: the engine opens the fault connection up front.
    return {"measure_rates": False, "may_postcopy": True}


def plan(view):
    return {"start": "pre_copy"}


def round_plan(history):
    return {"skip": "nothing"}


def after_round(history):
    rounds = history["rounds"]
    last = rounds[-1]
    limit_ms = history["limits"]["max_downtime_ms"]
    if history["pending_pages"] == 0:
        return {"stop_and_copy": {"rule": "converged"}}
    if last["estimated_downtime_ms"] <= limit_ms:
        return {"stop_and_copy": {"rule": "downtime"}}
    if len(rounds) >= 2:
        before = rounds[-2]["dirty_rate_pages_s"]
        now = last["dirty_rate_pages_s"]
        if now >= NOT_FALLING * before:
            log(f"round {last['round']}: dirty rate {now:.0f} pages/s "
                f"no longer falls (was {before:.0f}): post-copy")
            # "policy": the report's stop_rule says a rule of the
            # policy's own ended pre-copy.
            return {"post_copy": {"rule": "policy"}}
    if len(rounds) >= history["limits"]["max_rounds"]:
        return {"post_copy": {"rule": "max_rounds"}}
    return {"continue": {"throttle": "unchanged"}}


def push_order(history):
    # Push the neighbours of the page the destination last faulted on first.
    return "follow_faults"


ANSWER = {
    "setup": setup,
    "plan": plan,
    "round": round_plan,
    "after_round": after_round,
    "push_order": push_order,
}


def main():
    # One question per line; one answer per line, flushed at once (a
    # buffered answer would reach the engine only after the deadline).
    for line in sys.stdin:
        question = json.loads(line)
        answer = ANSWER[question["ask"]](question["view"])
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
