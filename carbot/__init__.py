"""The application shell shared by every part: settings, embedded services and the `carbot` command."""
