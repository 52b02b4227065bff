"""EchoCare-CLIP's evaluation protocol ("Ultrasound Vision-Language Alignment via Contrastive
Learning"), which `evaluate.py` runs, and the zero-shot prompts of both papers.

- `data.py`: the evaluation manifest and its split;
- `models.py`: the models under evaluation, as frozen feature extractors with a cache;
- `protocol.py`: alignment, retrieval, zero-shot, linear probes and few-shot fits;
- `probe.py`: the logistic-regression probe (scikit-learn's objective, in torch);
- `prompts.py`: zero-shot prompts;
- `plots.py`: the figures;
- `run.py`: evaluate.py's steps (models from its flags, test data, the protocol's blocks, table).
"""
