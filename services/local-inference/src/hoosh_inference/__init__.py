"""hoosh local inference: models on this host, llama.cpp on CPU or vLLM on GPU (gRPC)"""
