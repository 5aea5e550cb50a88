"""Data components: text sources, packing, file formats, token-shard and logit-cache readers and writers, inspection."""
