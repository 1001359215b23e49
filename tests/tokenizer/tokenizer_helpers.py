"""A seeded synthetic corpus for tokenizer tests, and the fixed texts of the parity gates.

The corpus mixes English-like prose, code with indentation, numbers, runs of spaces and tabs, a few non-Latin
scripts and Llama 2 chat markup, so that a 600-piece vocabulary has merged pieces for all of them. It is
generated (not read from the stdlib, which changes between Python versions), so numbers tests pin are stable.
"""

import random

WORDS = ("the quick brown fox jumps over lazy dog model token train data loss value function return class "
         "import print while for if else answer question system user assistant").split()
SCRIPTS = ["наука", "язык", "日本語", "中文", "Ελληνικά", "עברית", "العربية", "हिन्दी", "ภาษาไทย"]


def synthetic_documents(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        lines = []
        for _ in range(rng.randint(3, 12)):
            k = rng.random()
            if k < 0.5:
                lines.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 15))) + ".")
            elif k < 0.65:
                indent = "    " * rng.randint(0, 3)
                lines.append(f"{indent}x_{rng.randint(0, 99)} = {rng.randint(0, 10**6)} + y  # {rng.choice(WORDS)}")
            elif k < 0.75:
                lines.append(" ".join(rng.choice(SCRIPTS) for _ in range(rng.randint(1, 6))))
            elif k < 0.85:
                lines.append(f"[INST] {rng.choice(WORDS)} {rng.choice(WORDS)}? [/INST] {rng.choice(WORDS)} ")
            else:
                lines.append(f"\t{rng.choice(WORDS)}  {rng.choice(WORDS)}   {rng.randint(0, 9999)}")
        docs.append("\n".join(lines))
    return docs


# Digits, code, whitespace runs (spaces, tabs, newlines, at both ends), emoji (incl. ZWJ sequences and skin
# tones), non-Latin scripts (some absent from the corpus, so byte pieces), combining marks, NBSP, CRLF.
PARITY_TEXTS = [
    "Hello world",
    "the quick brown fox 1234567890 jumps",
    "3.14159 + 2,718 = 5.85978; 1e-9 0x1F 007",
    "def f(x):\n    return x ** 2  # square\n\nclass A:\n\tpass\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "two  spaces,   three,    four,\t\ttabs,\n\n\nnewlines",
    " leading space",
    "  two leading spaces",
    "\tleading tab",
    "\nleading newline",
    "trailing spaces   ",
    "trailing newline\n",
    " ",
    "   ",
    "\n",
    "",
    "emoji 🙂👍🏽 family 👨‍👩‍👧 flag 🇫🇷",
    "日本語のテキストと中文文本",
    "Русский текст и Ελληνικά",
    "العربية עברית हिन्दी ภาษาไทย 한국어",
    "e\u0301 (combining acute) vs é, ﬁ ligature, ｆｕｌｌｗｉｄｔｈ",
    "non\u00a0breaking\u00a0space and\u3000ideographic space",
    "windows\r\nline endings\r\n",
    "[INST] what is 2+2? [/INST] 4 ",
    "<<SYS>>\nBe brief.\n<</SYS>>\n\n",
    "math: ∑ᵢ xᵢ² ≤ ∞, arrows → ⇒, 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
]
