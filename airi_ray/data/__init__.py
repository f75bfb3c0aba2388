"""The data plane's storage: durable record logs, collections and features on LanceDB."""
