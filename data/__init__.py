"""Input pipelines, the synthetic shapes dataset and its evaluator. Interface (keys, dtypes, shapes):
data/README.md. Modules: shapes (the world), shapes_tfds (tfds builder), shapes_eval (ShapesEval),
sources (JSONL/folder/ArrayRecord/tfds), transforms (images), tokenizer (shapes tokenizer), packing,
pipeline (mixing, preparation, batching)."""
