"""What the tests that train the blog recipe on a tiny model share: a small rows file, and the two warnings the
blog's labels give."""
import json
from contextlib import contextmanager

import pytest


def arithmetic_rows(tmp_path, n=40) -> str:
    """A KoAlpaca-format .jsonl of ``n`` short Korean sums, in ``tmp_path``."""
    path = tmp_path / "rows.jsonl"
    with path.open("w", encoding="utf-8") as handle:
        for i in range(n):
            handle.write(json.dumps({"instruction": f"{i} 더하기 {i + 1}는 얼마인가요?",
                                     "output": f"{i}에 {i + 1}을 더하면 {2 * i + 1}입니다."}, ensure_ascii=False) + "\n")
    return str(path)


@contextmanager
def warned_about_the_blog_labels():
    # The blog's labels (pad = eos) warn twice: when the pad token is set, and when the LM collator is built.
    with pytest.warns(UserWarning, match="the LM collator will mask every EOS label"), \
            pytest.warns(UserWarning, match="never learns to stop"):
        yield
