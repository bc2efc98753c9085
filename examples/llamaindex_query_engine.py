"""A LlamaIndex query engine answered through the router (plain and streaming).

    python examples/llamaindex_query_engine.py
"""

from langchain_ollama import OllamaEmbeddings
from llama_index.core import Document, Settings, VectorStoreIndex
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events.llm import LLMChatEndEvent

from confidence_router import ConfidenceRoutedLlamaIndexLLM
from confidence_router.demo import available_backends, route_label
from confidence_router.llamaindex import LangChainEmbeddingAdapter


class RoutingPrinter(BaseEventHandler):
    """Query engines drop the LLM response's metadata; LlamaIndex events still carry it."""

    @classmethod
    def class_name(cls) -> str:
        return "RoutingPrinter"

    def handle(self, event, **kwargs) -> None:
        if isinstance(event, LLMChatEndEvent) and event.response is not None:
            routing = event.response.additional_kwargs.get("routing") or {}
            print(f"  [routing: {route_label(routing)} ({routing.get('reason')})]")


def main() -> None:
    with available_backends() as backends:
        Settings.llm = ConfidenceRoutedLlamaIndexLLM(router=backends.router())
        Settings.embed_model = LangChainEmbeddingAdapter(embeddings=OllamaEmbeddings(
            model=backends.embed_model, base_url=backends.settings.ollama_host,
        ))
        get_dispatcher().add_event_handler(RoutingPrinter())
        index = VectorStoreIndex.from_documents([
            Document(text="Kaunas lies at the confluence of the Neris and Nemunas rivers."),
            Document(text="Ouagadougou is the capital of Burkina Faso."),
        ])
        engine = index.as_query_engine(similarity_top_k=1)
        print("query:", engine.query("Which rivers meet at Kaunas?"))
        streaming = index.as_query_engine(similarity_top_k=1, streaming=True)
        print("stream: ", end="")
        streaming.query("Which rivers meet at Kaunas?").print_response_stream()
        print()

if __name__ == "__main__":
    main()
