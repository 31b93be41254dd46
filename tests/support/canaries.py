"""Credentials of every kind a log line, an env dump or a URL may carry, for leak tests."""

from __future__ import annotations

PEM_BODY = ("-----BEGIN RSA PRIVATE KEY-----\n"
            "MIIEowIBAAKCAQEAu1SU1LfVLPHCozMxH2Mo4lgOEePzNm0tRgeLezV6ffAt0gunVTLw7onLRnrq0/IzW7yWR7QkrmBL7jTKEn5u+qKhbwKfBstIs+bMY2Zkp18gnTxKLx\n"
            "-----END RSA PRIVATE KEY-----")
# One canary of each kind of credential a log line, an env dump or a URL may carry:
# kind -> (text that carries it, the secret part).
CANARIES = {
    "pem": (PEM_BODY, "MIIEowIBAAKCAQEAu1SU1LfVLPHCozMxH2Mo4lgOEePzNm0tRgeLez"),
    "azure": ("DefaultEndpointsProtocol=https;AccountName=acme;AccountKey=Zm9vYmFyQ2FuYXJ5"
              "S2V5MDEyMzQ1Njc4OQ==;EndpointSuffix=core.windows.net",
              "Zm9vYmFyQ2FuYXJ5S2V5MDEyMzQ1Njc4OQ=="),
    "sas": ("https://acme.blob.core.windows.net/c/x?sv=2022-11-02&sr=b&sig=CanarySig0123%2Bab",
            "CanarySig0123%2Bab"),
    "basic": ("Authorization: Basic dXNlcjpDYW5hcnlQYXNzd29yZA==",
              "dXNlcjpDYW5hcnlQYXNzd29yZA=="),
    "userinfo": ("https://ghp_" + "CanaryGithubToken0123456789abcdefgh" + "@github.com/o/r.git",
                 "CanaryGithubToken0123456789abcdefgh"),
    "userinfo-plain": ("fetching https://deploy:CanaryPlainPw@git.corp/x", "CanaryPlainPw"),
    "slack": ("post failed: xoxb-" + "123456789012-CanarySlackToken", "CanarySlackToken"),
    "gitlab": ("glpat-" + "CanaryGitlab0123456789", "CanaryGitlab0123456789"),
    "openai": ("key sk-proj-" + "CanaryOpenAIKey0123456789abcdef", "CanaryOpenAIKey0123456789"),
}
