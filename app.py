"""Serve the clip-hindi demo page: `python app.py --help`. A Hugging Face Space runs this file."""
from demo.app import main

if __name__ == "__main__":
    main()
