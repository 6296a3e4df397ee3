"""SentencePiece's training in a process of its own, for `tokenizer.train_sentencepiece`, which runs

    python -P llama_jax/spm_trainer.py

Standard input holds the trainer's flags, as one line of JSON, then the training sentences, one a
line (UTF-8, each ended by a newline); the trained model goes to standard output (exit status 0),
or SentencePiece's error message does (exit status 1). It imports nothing of the package, so that
it starts in a fraction of a second.
"""

import io
import json
import sys

import sentencepiece as spm


def main() -> int:
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
