"""A LlamaIndex chat engine (retrieval context + history) routed local-first.

    python examples/llamaindex_chat_engine.py
"""

from langchain_ollama import OllamaEmbeddings
from llama_index.core import Document, Settings, VectorStoreIndex
from llama_index.core.llms import ChatMessage

from confidence_router import ConfidenceRoutedLlamaIndexLLM
from confidence_router.demo import available_backends, route_label
from confidence_router.llamaindex import LangChainEmbeddingAdapter


def main() -> None:
    with available_backends() as backends:
        llm = ConfidenceRoutedLlamaIndexLLM(router=backends.router())
        Settings.llm = llm
        Settings.embed_model = LangChainEmbeddingAdapter(embeddings=OllamaEmbeddings(
            model=backends.embed_model, base_url=backends.settings.ollama_host,
        ))
        index = VectorStoreIndex.from_documents(
            [Document(text="Kaunas lies at the confluence of the Neris and Nemunas rivers.")]
        )
        chat = index.as_chat_engine(chat_mode="context", similarity_top_k=1)
        print("chat:", chat.chat("Which rivers meet at Kaunas?"))

        # The LLM itself returns the routing decision on every response, with per-call knobs.
        reply = llm.chat(
            [ChatMessage(role="user", content="Who was the second president of Kenya?")],
            threshold=0.8,
        )
        routing = reply.additional_kwargs["routing"]
        print(f"direct: {reply.message.content} "
              f"[routing: {route_label(routing)} ({routing['reason']})]")

if __name__ == "__main__":
    main()
