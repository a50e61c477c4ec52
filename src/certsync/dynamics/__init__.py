"""The Dynamics portal: contract v1, HTTP client, auth, signing, and HLFDynamicsSyncService."""
