"""Runtime: runs a bundle the way the board does, on onnxruntime.

ort.py (the onnxruntime adapter: session options, shared thread pool, relaxed graph loading, IO
binding; every private onnxruntime API use), engine.py (Engine: prefill / decode / post over the KV
cache), generation.py (Sampler, Generator, StreamDecoder), chat.py (Chat: a conversation with the
bundle's tokenizer), kvcache.py (--kvcache_path files), tokenizer_client.py (the board's HTTP
tokenizer protocol) and the bundles' standalone tokenizer server (tokenizer_server.py, never imported
as part of this package). It reads bundles through generator/contract.py and imports nothing of the
build (recipe, resolve, inputs, export) or of verify."""
