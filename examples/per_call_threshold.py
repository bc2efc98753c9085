"""Change the confidence threshold per call: invoke kwargs, bind, and configurable fields.

    python examples/per_call_threshold.py
"""

from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import ConfigurableField

from confidence_router.demo import available_backends, route_label


def main() -> None:
    with available_backends() as backends:
        router = backends.router()
        question = "What is the capital of France?"

        # 1. an invoke kwarg ("would escalate" when there is no cloud tier to escalate to)
        for threshold in (0.5, 0.99):
            routing = router.invoke(question, threshold=threshold).response_metadata["routing"]
            print(f"invoke threshold={threshold}: {route_label(routing)} "
                  f"(confidence {routing['confidence']})")

        # 2. bind: a stricter router for a sensitive part of the app
        strict = router.bind(threshold=0.95)
        print("bound 0.95:", route_label(strict.invoke(question).response_metadata["routing"]))

        # 3. configurable inside an LCEL chain (e.g. per user or per tenant)
        chain = (
            ChatPromptTemplate.from_template("{question}")
            | router.configurable_fields(threshold=ConfigurableField(id="threshold"))
            | StrOutputParser()
        )
        print("configurable 0.99:",
              chain.with_config(configurable={"threshold": 0.99}).invoke({"question": question}))


if __name__ == "__main__":
    main()
