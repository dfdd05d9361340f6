"""Integrations with the frameworks people train in (Lightning, the Hugging Face Trainer, Accelerate).

Each is a module imported only when used; its framework comes with an optional extra
(``pip install 'weightslab[lightning]'``, ``'weightslab[transformers]'``, ``'weightslab[accelerate]'``).
"""
