import sys, re
from collections import Counter
from datasets.readers import load_annotations
from datasets.tokenizer import learn_wordpiece_vocab, tokenizer_from_vocab
for style in ("classic","street","cctv"):
    sp = load_annotations("cuhkpedes", f"/tmp/wt13/data/{style}-400")
    train=[r.caption for r in sp.train]; test=[r.caption for r in sp.test]
    for size in (1000, 2000, 4000):
        vocab = learn_wordpiece_vocab(train, size)
        tok = tokenizer_from_vocab(vocab, True)
        words = Counter(w for c in test for w in re.findall(r"[a-z0-9'-]+|[^\sa-z0-9]", c.lower()) )
        occ = sum(words.values()); split=chars=0; splitset=set()
        for w,n in words.items():
            pieces = tok.tokenize(w)
            if len(pieces)>1: split+=n; splitset.add(w)
            if len(pieces)>1 and all(len(p.replace("##",""))==1 for p in pieces): chars+=n
        lens=[len(tok(c)["input_ids"]) for c in test]
        print(f"{style:8s} vocab {size} (learnt {len(vocab)}): test word occurrences split {100*split/occ:.1f}%, into single characters {100*chars/occ:.1f}%, distinct words {len(words)} of which split {len(splitset)}, tokens/caption mean {sum(lens)/len(lens):.1f} max {max(lens)}")
