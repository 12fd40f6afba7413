"""hoosh audit: durable HMAC-chained record of every event (NATS in, gRPC in)"""
