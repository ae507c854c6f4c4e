"""Where OpenAI's released CLIP weights live, and the SHA256 of each file.

The digest is also the second-to-last component of each URL; it is kept here as its own field so that a
download is checked against a value that does not depend on parsing the URL.
"""

from __future__ import annotations

from dataclasses import dataclass

_BASE_URL = "https://openaipublic.azureedge.net/clip/models"


@dataclass(frozen=True)
class ReleasedWeights:
    """One released TorchScript archive: its download URL and the SHA256 of its bytes."""

    url: str
    sha256: str


def _release(sha256: str, filename: str) -> ReleasedWeights:
    return ReleasedWeights(url=f"{_BASE_URL}/{sha256}/{filename}", sha256=sha256)


# Architecture name (a key of clip.architectures.RELEASED_ARCHITECTURES) -> the file OpenAI published.
RELEASED_WEIGHTS: dict[str, ReleasedWeights] = {
    "RN50": _release("afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762", "RN50.pt"),
    "RN101": _release("8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599", "RN101.pt"),
    "RN50x4": _release("7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd", "RN50x4.pt"),
    "RN50x16": _release("52378b407f34354e150460fe41077663dd5b39c54cd0bfd2b27167a4a06ec9aa", "RN50x16.pt"),
    "RN50x64": _release("be1cfb55d75a9666199fb2206c106743da0f6468c9d327f3e0d0a543a9919d9c", "RN50x64.pt"),
    "ViT-B/32": _release("40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af", "ViT-B-32.pt"),
    "ViT-B/16": _release("5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f", "ViT-B-16.pt"),
    "ViT-L/14": _release("b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836", "ViT-L-14.pt"),
    "ViT-L/14@336px": _release("3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02", "ViT-L-14-336px.pt"),
}
