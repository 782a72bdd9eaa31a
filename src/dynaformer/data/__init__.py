from .corpus import read_text
from .dataset import BatchSampler, TokenSplits, eval_windows, open_splits, write_splits
from .tokenizers import ByteTokenizer, CharTokenizer, load_tokenizer, save_tokenizer, tokenizer_from_dict

__all__ = ["BatchSampler", "ByteTokenizer", "CharTokenizer", "TokenSplits", "eval_windows", "load_tokenizer",
           "open_splits", "read_text", "save_tokenizer", "tokenizer_from_dict", "write_splits"]
