"""Read the routing decision, its evidence, latency and token usage from a response.

    python examples/routing_decision.py
"""

import json

from confidence_router import ConfidenceRoutedLLM


def main() -> None:
    router = ConfidenceRoutedLLM.from_settings()
    for question in ["What is the capital of France?", "Who was the second president of Kenya?"]:
        message = router.invoke(question)
        routing = message.response_metadata["routing"]
        print(f"\n{question}\n  answer:    {message.text}")
        print(f"  decision:  {routing['decision']} ({routing['reason']}), confidence "
              f"{routing['confidence']} vs threshold {routing['threshold']}")
        if routing["escalated"]:
            print(f"  local answer was: {routing['local_answer']!r}")
        print(f"  latency:   {json.dumps({k: round(v, 3) for k, v in routing['latency_s'].items()})}")
        print(f"  usage:     {json.dumps(routing['usage'])}")
        if "cost_usd" in routing:
            print(f"  cost:      ${routing['cost_usd']:.6f}")


if __name__ == "__main__":
    main()
