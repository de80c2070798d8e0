"""The embedded default model: its configs, its committed weights, the checkpoint builders, the procedural scenes
it is trained on, its training and its evaluation. It uses export/ (tokenizer, seeded weights); export/ never uses it.
"""
