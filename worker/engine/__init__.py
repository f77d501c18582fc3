"""The guard engine: policy + prompt + model + parsing, shared by the stream and the HTTP endpoint."""
