"""SentencePiece's training in a process of its own, for `tokenizer.train_sentencepiece`, which runs

    python -P llama_jax/spm_trainer.py PARENT_PID

Standard input holds the trainer's flags, as one line of JSON, then the training sentences, one a
line (UTF-8, each ended by a newline); the trained model goes to standard output (exit status 0),
or SentencePiece's error message does (exit status 1). It imports nothing of the package, so that
it starts in a fraction of a second.
"""

import io
import json
import os
import signal
import sys

import sentencepiece as spm


def _tied_to(parent: int) -> None:
    """Ctrl-C is left to the parent (a terminal's Ctrl-C reaches it too, and it stops this process),
    and the parent's death ends this process (SIGTERM, where libc has prctl), so that no training is
    left running. Done here, not in a function the parent's fork would run before this program: a
    fork of a process that has imported JAX, which runs threads, can deadlock (and JAX warns of it)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before that call: no SIGTERM would come
        sys.exit(1)


def main() -> int:
    _tied_to(int(sys.argv[1]))
    model = io.BytesIO()
    flags = json.loads(sys.stdin.buffer.readline())
    sentences = (line.removesuffix(b"\n") for line in sys.stdin.buffer)
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=sentences, model_writer=model, **flags)
    except Exception as e:  # (SentencePiece's are RuntimeError, or ValueError for a setting it refuses)
        sys.stdout.buffer.write((str(e) or repr(e)).encode("utf-8", "backslashreplace"))
        return 1
    sys.stdout.buffer.write(model.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
