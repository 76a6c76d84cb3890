"""Torch-only parallel machinery (layouts, shard-aware norms, parameter server, pipeline and tensor parallel);
nothing here imports Lightning."""
