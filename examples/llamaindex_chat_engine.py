"""A LlamaIndex chat engine (retrieval context + history) routed local-first.

    python examples/llamaindex_chat_engine.py
"""

import os

from langchain_ollama import OllamaEmbeddings
from llama_index.core import Document, Settings, VectorStoreIndex
from llama_index.core.llms import ChatMessage

from confidence_router import ConfidenceRoutedLlamaIndexLLM, RouterSettings
from confidence_router.llamaindex import LangChainEmbeddingAdapter


def main() -> None:
    settings = RouterSettings.load()
    llm = ConfidenceRoutedLlamaIndexLLM.from_settings()
    Settings.llm = llm
    Settings.embed_model = LangChainEmbeddingAdapter(embeddings=OllamaEmbeddings(
        model=os.environ.get("CONFIDENCE_ROUTER_EMBED_MODEL", "nomic-embed-text"),
        base_url=settings.ollama_host,
    ))
    index = VectorStoreIndex.from_documents(
        [Document(text="Kaunas lies at the confluence of the Neris and Nemunas rivers.")]
    )
    chat = index.as_chat_engine(chat_mode="context", similarity_top_k=1)
    print("chat:", chat.chat("Which rivers meet at Kaunas?"))

    # The LLM itself returns the routing decision on every response, with per-call knobs.
    reply = llm.chat([ChatMessage(role="user", content="Who was the second president of Kenya?")],
                     threshold=0.8)
    routing = reply.additional_kwargs["routing"]
    print(f"direct: {reply.message.content} [routing: {routing['decision']} ({routing['reason']})]")


if __name__ == "__main__":
    main()
