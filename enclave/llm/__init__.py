"""Language models in the enclave: loading from memory and generating tokens."""
