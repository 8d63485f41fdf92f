"""The intake chain shared by every channel (decode, validate, normalise, identify, classify,
persist) and the real-time Kafka driver. Receives engines, producers and settings as arguments."""
