"""The maskcls commands, one module per stage; cli.py assembles them into the app."""
