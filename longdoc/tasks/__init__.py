"""What a user asks for, over any backend: answers (one question or many), chat, map-reduce summaries,
citations."""
