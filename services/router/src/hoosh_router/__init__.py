"""hoosh router: model resolution, budget, backend calls, events (gRPC)"""
