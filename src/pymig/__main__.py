from pymig.cli import main

main()
