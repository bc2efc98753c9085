"""Read the routing decision, its evidence, latency and token usage from a response.

    python examples/routing_decision.py
"""

import json

from confidence_router.demo import available_backends, route_label


def main() -> None:
    with available_backends() as backends:
        router = backends.router()
        for question in ["What is the capital of France?",
                         "Who was the second president of Kenya?"]:
            message = router.invoke(question)
            routing = message.response_metadata["routing"]
            print(f"\n{question}\n  answer:    {message.text}")
            # decision is "local" or "cloud"; route_label also says "would escalate" when a
            # low-confidence answer stayed local only because there is no cloud tier.
            print(f"  decision:  {route_label(routing)} ({routing['reason']}), confidence "
                  f"{routing['confidence']} vs threshold {routing['threshold']}")
            if routing["escalated"]:
                print(f"  local answer was: {routing['local_answer']!r}")
            latency = {k: round(v, 3) for k, v in routing["latency_s"].items()}
            print(f"  latency:   {json.dumps(latency)}")
            print(f"  usage:     {json.dumps(routing['usage'])}")
            if routing.get("cost_usd") is not None:
                print(f"  cost:      ${routing['cost_usd']:.6f}")


if __name__ == "__main__":
    main()
