#!/usr/bin/python3
"""A large JSON-lines corpus of real text for the shard measurements (docs/data.md, "Measured").

Every document is a run of consecutive sentences of one Brown document (tags stripped) or a run of WordNet
glosses, chosen by a seeded RNG, so the text is English as Brown and WordNet wrote it (not random bytes),
and documents differ from one another though the sources are ~6 MB. Each line is
{"text": ..., "domain": <Brown genre or "wordnet_<pos>">}. Stops once --gb GB are written.

    /usr/bin/python3 scripts/make-big-jsonl.py --out big.jsonl [--gb 2.1] [--seed 1]
"""
import argparse
import json
import os
import random
import re
import sys

GENRES = {"a": "press_reportage", "b": "press_editorial", "c": "press_reviews", "d": "religion",
          "e": "skill_hobbies", "f": "popular_lore", "g": "belles_lettres", "h": "government",
          "j": "learned", "k": "fiction_general", "l": "mystery", "m": "science_fiction",
          "n": "adventure", "p": "romance", "r": "humor"}
NO_SPACE_BEFORE = {".", ",", ";", ":", "?", "!", "''", ")", "'s"}


def brown_sentences(path):
    """A Brown file's sentences (one per line in the tagged file), detokenized plainly."""
    out = []
    with open(path, encoding="latin-1") as f:
        for line in f:
            words = [t.rsplit("/", 1)[0] for t in line.split() if "/" in t]
            if not words:
                continue
            s = ""
            after_open = False  # no space after an opening quote or bracket
            for w in words:
                space = w not in NO_SPACE_BEFORE and w != "''"
                if s and space and not after_open:
                    s += " "
                s += {"``": '"', "''": '"'}.get(w, w)
                after_open = w in ("``", "(")
            out.append(s)
    return out


def wordnet_glosses(path):
    out = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("  ") or "|" not in line:
                continue  # the licence header
            head, gloss = line.split("|", 1)
            fields = head.split()
            word = fields[4].replace("_", " ") if len(fields) > 4 else ""
            gloss = gloss.strip()
            word = re.sub(r"\(.*\)$", "", word)  # adjectives' markers: "big(p)"
            if word and gloss:
                out.append(f"{word}: {gloss}.")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--gb", type=float, default=2.1)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--brown", default=os.path.join(os.path.dirname(__file__), "..", "data", "brown"))
    ap.add_argument("--wordnet", default="/usr/share/wordnet")
    a = ap.parse_args()
    if os.path.exists(a.out):
        sys.exit(f"make-big-jsonl: {a.out} exists")
    brown = []
    for name in sorted(os.listdir(a.brown)):
        if re.fullmatch(r"c[a-r]\d\d", name):
            brown.append((GENRES[name[1]], brown_sentences(os.path.join(a.brown, name))))
    if not brown:
        sys.exit(f"make-big-jsonl: no Brown documents in {a.brown} (scripts/install-deps.sh installs them)")
    wordnet = []
    for pos in ("noun", "verb", "adj", "adv"):
        p = os.path.join(a.wordnet, "data." + pos)
        if os.path.exists(p):
            wordnet.append(("wordnet_" + pos, wordnet_glosses(p)))
    if not wordnet:
        sys.exit(f"make-big-jsonl: no WordNet in {a.wordnet} (Debian's wordnet-base)")
    rng = random.Random(a.seed)
    target = int(a.gb * 1e9)
    written = docs = 0
    tmp = a.out + ".tmp"
    with open(tmp, "w", encoding="utf-8", buffering=1 << 22) as f:
        while written < target:
            if rng.random() < 0.8:
                domain, sents = rng.choice(brown)
                n = rng.randint(8, 40)
                start = rng.randrange(max(1, len(sents) - n))
                text = " ".join(sents[start:start + n])
            else:
                domain, glosses = rng.choice(wordnet)
                text = " ".join(rng.choice(glosses) for _ in range(rng.randint(10, 40)))
            line = json.dumps({"text": text, "domain": domain}, ensure_ascii=False) + "\n"
            f.write(line)
            written += len(line.encode("utf-8"))
            docs += 1
            if docs % 200000 == 0:
                print(f"\r{written / 1e9:.2f} / {a.gb:.2f} GB", end="", file=sys.stderr, flush=True)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, a.out)
    print(f"\nwrote {a.out}: {docs} documents, {written} bytes", file=sys.stderr)


if __name__ == "__main__":
    main()
