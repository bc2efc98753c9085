"""A RAG chain with a retriever: retrieved context | prompt | router | parser.

Uses LangChain's in-memory vector store with Ollama embeddings (any LangChain retriever works).

    python examples/rag_chain.py
"""

from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnablePassthrough
from langchain_core.vectorstores import InMemoryVectorStore
from langchain_ollama import OllamaEmbeddings

from confidence_router.demo import available_backends

DOCUMENTS = [
    "Kaunas is Lithuania's second-largest city, at the confluence of the Neris and Nemunas.",
    "Ouagadougou is the capital of Burkina Faso.",
    "The Treaty of Westphalia of 1648 ended the Thirty Years' War.",
]


def main() -> None:
    with available_backends() as backends:
        embeddings = OllamaEmbeddings(model=backends.embed_model,
                                      base_url=backends.settings.ollama_host)
        retriever = InMemoryVectorStore.from_texts(DOCUMENTS, embeddings).as_retriever(k=2)
        prompt = ChatPromptTemplate.from_template(
            "Use the context to answer in a few words.\nContext:\n{context}\n\n"
            "Question: {question}"
        )
        chain = (
            {"context": retriever | (lambda docs: "\n".join(d.page_content for d in docs)),
             "question": RunnablePassthrough()}
            | prompt
            | backends.router()
            | StrOutputParser()
        )
        print(chain.invoke("Which rivers meet at Kaunas?"))


if __name__ == "__main__":
    main()
