"""The chat bots: one platform-agnostic conversation and thin adapters for Telegram, Discord and the terminal."""
