"""Print which torch `make qwenvl` installed, and whether torchvision's compiled ops load against it.

PyPI's Linux torchvision is a CUDA build: next to a CPU torch its ops fail to load, which is why
`make qwenvl` takes both from one TORCH_INDEX_URL.
"""

from __future__ import annotations

import torch


def main() -> None:
    cuda = torch.version.cuda or "none (CPU)"
    line = f"torch {torch.__version__} | CUDA build: {cuda} | GPU visible: {torch.cuda.is_available()}"
    try:
        import torchvision
    except ImportError:
        print(f"{line} | torchvision: not installed")
        return
    except RuntimeError as exc:  # its compiled ops did not register: "operator torchvision::nms does not exist"
        hint = "built for another torch or CUDA; install both from one TORCH_INDEX_URL"
        print(f"{line} | torchvision does NOT load ({exc}): {hint}")
        return
    print(f"{line} | torchvision {torchvision.__version__}")


if __name__ == "__main__":
    main()
