"""hoosh speech-to-text service."""
