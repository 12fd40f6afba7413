"""hoosh command line: hoosh up runs every service, Redis and NATS"""
