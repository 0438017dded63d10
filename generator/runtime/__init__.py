"""Runtime: the local onnxruntime runner (runner.py, kvcache.py), the tokenizer server client
(tokenizer_client.py) and the bundles' standalone tokenizer server (tokenizer_server.py, never imported
as part of this package)."""
