"""Has the base memorised a corpus? Its perplexity per domain (top-level folder), beside the standard library's.

A corpus for experts must be text the base has not memorised, or there is nothing for an expert to learn. Prints
one JSON object: for each domain, the base's perplexity on the first --tokens tokens of --docs documents drawn
with a fixed seed, and the same for standard-library modules (which SmolLM2 has memorised) for contrast.

    python benchmarks/corpus_perplexity.py [--base smollm2-135m] [--data data/system-docs] [--docs 8]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections import defaultdict

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--data", default="data/system-docs")
    parser.add_argument("--docs", type=int, default=8, help="documents per domain")
    parser.add_argument("--tokens", type=int, default=512, help="tokens scored per document (its beginning)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from upcycle.data import load_documents
    from upcycle.data.packing import pack, tokenize
    from upcycle.eval.perplexity import token_nll
    from upcycle.models.base import load_base

    model, tokenizer = load_base(args.base, device="cpu")
    by_domain = defaultdict(list)
    for doc in load_documents(args.data):
        by_domain[doc.id.split("/")[0] if "/" in doc.id else "(top level)"].append(doc)
    by_domain["stdlib (for contrast)"] = load_documents("stdlib")
    rng = random.Random(args.seed)
    start = time.perf_counter()
    result: dict = {"base": args.base, "data": args.data, "docs_per_domain": args.docs, "tokens_per_doc": args.tokens}
    domains = {}
    for domain, docs in sorted(by_domain.items()):
        sample = rng.sample(docs, min(args.docs, len(docs)))
        # the first block of each document: its beginning, as a router and a user would see it
        firsts = [pack(tokenize(tokenizer, [d.text]), args.tokens, tokenizer.pad_token_id) for d in sample]
        inputs, labels = (torch.cat([b[i][:1] for b in firsts]) for i in (0, 1))
        nll, count = token_nll(model, inputs, labels, batch_size=4)
        domains[domain] = {"perplexity": round(math.exp(nll / count), 2), "tokens": count,
                           "documents": [d.id for d in sample]}
    result["domains"] = domains
    result["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
