"""The CLI's own voice: third-party lines that say nothing to the user are filtered at their source."""

import logging


def test_bitsandbytes_kernels_hint_is_dropped_and_said_once_in_our_words(capsys):
    from ecoadapt.model import voice

    logger = logging.getLogger(voice.BNB_CPU_LOGGER)  # the logger bitsandbytes' CPU backend uses
    assert voice._HINT in logger.filters  # installed when ecoadapt.model is imported
    kept: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: kept.append(record.getMessage())  # type: ignore[method-assign]
    logger.addHandler(handler)
    try:
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please ...", "no module")
        logger.warning("another bitsandbytes warning")
    finally:
        logger.removeHandler(handler)
    assert kept == ["another bitsandbytes warning"]
    note = voice.kernels_note()
    assert note is not None and "pip install kernels" in note


def test_the_gguf_readers_bar_is_off_inside_a_load_and_back_after():
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    from ecoadapt.model import voice

    with voice.quiet_gguf_conversion():
        assert gguf_utils.tqdm(range(3)).disable
    with open("/dev/null", "w") as sink:
        assert not gguf_utils.tqdm(range(3), file=sink).disable
