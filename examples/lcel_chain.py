"""An LCEL chain: prompt | router | parser.

Runs on whatever this machine has (see README "Examples"): your Ollama model, else the
embedded one; Bedrock with AWS credentials, else escalations are only reported.

    python examples/lcel_chain.py
"""

from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate

from confidence_router.demo import available_backends


def main() -> None:
    with available_backends() as backends:  # ChatOllama local, ChatBedrockConverse cloud
        router = backends.router()
        prompt = ChatPromptTemplate.from_messages(
            [("system", "Answer in a few words."), ("human", "{question}")]
        )
        chain = prompt | router | StrOutputParser()
        for question in ["What is the capital of France?",
                         "Who was the second president of Kenya?"]:
            print(f"{question} -> {chain.invoke({'question': question})}")


if __name__ == "__main__":
    main()
