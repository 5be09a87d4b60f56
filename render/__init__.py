"""Video read/write with audio, paste-back, previews, storyboards, FLAME mesh drawing."""
