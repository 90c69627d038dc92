"""orpo-tune: align causal language models with ORPO from one YAML recipe."""

import logging

__version__ = "0.1.0"


class _DropKernelsHubNotice(logging.Filter):
    """bitsandbytes logs, at import on an AVX512-BF16 CPU, that it could not fetch a CPU kernel for its
    packed 4-bit inference format from the Hugging Face hub (the optional `kernels` package). orpo-tune keeps
    4-bit layers out of that format (models.loading.keep_4bit_weights_unpacked), so the kernel would never run and
    the line tells a user nothing they can act on. Only that one message is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward from kernels-community")


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropKernelsHubNotice())
