"""Integrations with training frameworks built on the engines; each is a module of its own, imported only when
asked for (``scaling_plugins.integrations.huggingface`` needs ``pip install 'scaling_plugins[hf]'``)."""
