"""What feeds the model: corpus readers, tokenizers, the cached token file and its sampling rule.

    corpus     built-in corpora (shipped in installed packages) and the piece stream of any corpus spec
    readers    the user's files: .txt, .jsonl[.gz|.zst], .parquet, .arrow, datasets.save_to_disk folders
    tokenizer  SentencePiece .model and Hugging Face tokenizer.json
    tokens     DataConfig, the token file (tokenized once, cached) and TokenData's deterministic batches
"""
from curvtrain.models.data.tokens import DataConfig, TokenData, load_tokenizer, model_config, prepare_tokens

__all__ = ["DataConfig", "TokenData", "load_tokenizer", "model_config", "prepare_tokens"]
