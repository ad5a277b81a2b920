"""Images and vectors: preprocessing, the two-backbone embedding ensemble, its weights and
embedding versions, and the deer assignment rule.

Nothing is re-exported here, so that `import reid.matching` stays free of torch. The modules:
`reid.preprocess`, `reid.backbones`, `reid.weights`, `reid.embedder`, `reid.matching`.
"""
