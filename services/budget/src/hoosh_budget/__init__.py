"""hoosh budget: named token pools in Redis (gRPC)"""
