"""An LCEL chain: prompt | router | parser.

Runs against whatever the settings point at (see README "Pointing it at real Ollama and
Bedrock"): your Ollama and Bedrock, or the project's test bed (tests/test_examples.py).

    python examples/lcel_chain.py
"""

from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate

from confidence_router import ConfidenceRoutedLLM


def main() -> None:
    router = ConfidenceRoutedLLM.from_settings()  # ChatOllama local, ChatBedrockConverse cloud
    prompt = ChatPromptTemplate.from_messages(
        [("system", "Answer in a few words."), ("human", "{question}")]
    )
    chain = prompt | router | StrOutputParser()
    for question in ["What is the capital of France?", "Who was the second president of Kenya?"]:
        print(f"{question} -> {chain.invoke({'question': question})}")


if __name__ == "__main__":
    main()
